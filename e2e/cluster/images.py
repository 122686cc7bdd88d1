"""The images the node runs, built here without a registry, cached by what they are built from.

==============================  ================================================================
image                           what it is
==============================  ================================================================
``intercept.test/python:3.11``  Debian bookworm's ``python3`` and ``pip`` (``mmdebstrap``, minbase):
                                the base of the others, and ``PYTHON_IMAGE`` of their Dockerfiles
``intercept.test/pause:3.10``   the pod sandbox: ``pause.c`` of the kubernetes module (:mod:`.build`)
``intercept.test/agent:dev``    ``agent_image/Dockerfile`` of this checkout, unchanged
``intercept.test/cli:dev``      the same Dockerfile's ``cli`` target: ``intercept`` and all its dependencies
``intercept.test/sample:1``     the e2e sample app (``e2e/app/``): answers ``cluster/POD``
``intercept.test/sample-v2:1``  the same app answering ``v2/POD``: a changed build, for sandboxes
``intercept.test/echo:1``       any HTTP service (``e2e/echo/``): every port of ``$PORTS``,
                                ``X-Served-By: POD``, the request echoed as JSON
``intercept.test/servers:1``    real servers from Debian's packages (``e2e/servers/``): ``redis-server``,
                                PostgreSQL 15, an h2c gRPC server (``python3-grpcio``)
``intercept.test/sleep:1``      ``intercept`` (as an injected agent runs it) never listens: never ready
``intercept.test/crash:1``      ``intercept`` exits 1 at once: a crash loop
==============================  ================================================================

:func:`ensure_images` builds each with ``buildah`` (its own storage, under the cache) or
reuses it: an image is a docker archive named by a hash of its inputs (the files of its
build context, its Dockerfile, the key of its base, how it is built), so a change to
``intercept/`` rebuilds the agent and the CLI and nothing else. :func:`load` imports them
into a node's containerd. Their ``pip`` steps reach the package index as this machine's
pip does (its CA bundle and ``pip.conf`` bound read-only for the build only) and install
the versions of ``constraints.txt``, the ones the tests run on.

This machine's root may not raise a resource limit (no CAP_SYS_RESOURCE), so builds run
with limits at or below the current ones.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from e2e.cluster.build import Binaries, BuildFailed, cache_root

ROOT = Path(__file__).resolve().parents[2]
REGISTRY = "intercept.test"
BASE = f"{REGISTRY}/python:3.11"
PAUSE = f"{REGISTRY}/pause:3.10"
AGENT = f"{REGISTRY}/agent:dev"
CLI = f"{REGISTRY}/cli:dev"
SAMPLE = f"{REGISTRY}/sample:1"
ECHO = f"{REGISTRY}/echo:1"
SERVERS = f"{REGISTRY}/servers:1"
PACKAGES = ("mmdebstrap", "buildah")  # the tools, by Debian package (the command has the same name)
FORMAT = 3  # how images are built here: raise it to rebuild them all

Say = Callable[[str], None]


@dataclass(frozen=True)
class Image:
    """How to build one image: from a Dockerfile (``context``), or as ``base`` with another config."""

    name: str
    base: str | None = None
    context: Path | None = None  # a Dockerfile build from this directory
    dockerfile: Path | None = None  # default: context/Dockerfile
    inputs: tuple[Path, ...] = ()  # what the build reads, when not the whole context
    config: tuple[str, ...] = ()  # `buildah config` options, for an image that is its base with another config
    script: str = ""  # ... and this program as /usr/local/bin/intercept (what an injected agent container runs)
    pip: bool = False  # its RUN steps install from the package index
    target: str | None = None  # the Dockerfile's stage to build (default: its last)
    apt: bool = False  # its RUN steps install Debian's packages (apt-get, from the base's mirror)


# What agent_image/Dockerfile reads: its context as /.dockerignore filters it, and the pins.
PACKAGE_INPUTS = (ROOT / "pyproject.toml", ROOT / "README.md", ROOT / "intercept", ROOT / ".dockerignore",
                  ROOT / "agent_image" / "strip_wheels.py", ROOT / "constraints.txt")

IMAGES = (
    Image(BASE),
    Image(PAUSE),
    Image(AGENT, BASE, ROOT, ROOT / "agent_image" / "Dockerfile", PACKAGE_INPUTS, pip=True),
    Image(CLI, BASE, ROOT, ROOT / "agent_image" / "Dockerfile", PACKAGE_INPUTS, pip=True, target="cli"),
    Image(SAMPLE, BASE, ROOT / "e2e" / "app"),
    Image(f"{REGISTRY}/sample-v2:1", SAMPLE, config=("--env", "SAMPLE_VERSION=v2")),
    Image(ECHO, BASE, ROOT / "e2e" / "echo"),
    Image(SERVERS, BASE, ROOT / "e2e" / "servers", apt=True),
    Image(f"{REGISTRY}/sleep:1", BASE, script="#!/bin/sh\nexec python3 -c 'import signal, sys; "
                 "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); signal.pause()'\n",
          config=("--entrypoint", '["intercept"]', "--cmd", "", "--user", "65532:65532")),
    Image(f"{REGISTRY}/crash:1", BASE, script="#!/bin/sh\necho crashing on purpose\nexit 1\n",
          config=("--entrypoint", '["intercept"]', "--cmd", "", "--user", "65532:65532")),
)

IMAGES_BY_NAME = {image.name: image for image in IMAGES}

# The base: python3 and pip from Debian, pip free to install (no EXTERNALLY-MANAGED), no docs.
MMDEBSTRAP = [
    "mmdebstrap", "--variant=minbase", "--mode=root", "--quiet",
    "--aptopt=Apt::Install-Recommends \"false\"",
    "--include=python3,python3-pip,python-is-python3,ca-certificates,netbase",
    "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright", "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
    "--customize-hook=rm -f \"$1\"/usr/lib/python3.*/EXTERNALLY-MANAGED",
    "--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*",
    "bookworm",  # then the rootfs archive, then the mirror
]
MIRROR = "http://deb.debian.org/debian"
BASE_CONFIG = ("--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "--env", "LANG=C.UTF-8",
               "--cmd", '["python3"]')


def unavailable() -> str | None:
    """Why images cannot be built here, or None."""
    missing = [p for p in PACKAGES if shutil.which(p) is None]
    if missing:
        return f"{' and '.join(missing)} not installed: the node's images are built with them (apt-get install {' '.join(missing)})"
    return None


@dataclass(frozen=True)
class Built:
    """One image as a docker archive in the cache."""

    name: str
    archive: Path


class Images:
    """The images of :data:`IMAGES` in ``cache`` (default: ``CACHE/images``), built with ``binaries``' pause."""

    def __init__(self, binaries: Binaries, say: Say = lambda line: None, cache: Path | None = None) -> None:
        self.binaries = binaries
        self.say = say
        self.dir = cache or cache_root() / "images"
        self.storage = self.dir / "storage"
        self.keys: dict[str, str] = {}

    def ensure(self) -> list[Built]:
        """Every image, built now or reused; the archives of other keys are removed."""
        missing = unavailable()
        if missing:
            from e2e.cluster.build import BuildUnavailable

            raise BuildUnavailable(missing)
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time (test workers start clusters at once)
            built = [self._ensure(image) for image in IMAGES]
            keep = {b.archive for b in built}
            for old in self.dir.glob("*.tar"):
                if old not in keep and not old.name.startswith("all."):
                    old.unlink()
            bundle(built)
        return built

    def archive(self, image: Image) -> Path:
        return self.dir / f"{image.name.replace('/', '_').replace(':', '_')}.{self.key(image)}.tar"

    def key(self, image: Image) -> str:
        if image.name in self.keys:
            return self.keys[image.name]
        digest = hashlib.sha256(f"{FORMAT}\0{image.name}\0".encode())
        if image.name == BASE:
            digest.update(json.dumps([MMDEBSTRAP, MIRROR, BASE_CONFIG]).encode())
        elif image.name == PAUSE:
            digest.update(self.binaries["pause"].read_bytes())
        else:
            assert image.base is not None
            digest.update(f"{self.key(IMAGES_BY_NAME[image.base])}\0{json.dumps(image.config)}\0{image.script}\0".encode())
            for path in _files(image.inputs or ((image.context,) if image.context else ())):
                digest.update(f"{path.relative_to(ROOT)}\0".encode())
                digest.update(path.read_bytes())
            if image.dockerfile:
                digest.update(image.dockerfile.read_bytes())
            if image.target:
                digest.update(f"\0target={image.target}".encode())
        self.keys[image.name] = digest.hexdigest()[:16]
        return self.keys[image.name]

    def _ensure(self, image: Image) -> Built:
        archive = self.archive(image)
        if archive.is_file():
            return Built(image.name, archive)
        started = time.monotonic()
        self.say(f"images: building {image.name} ...")
        if image.base is not None and not self._present(image.base):
            self._buildah("pull", "--quiet", f"docker-archive:{self.archive(IMAGES_BY_NAME[image.base])}")
        if image.name == BASE:
            self._build_base()
        elif image.name == PAUSE:
            self._build_from_scratch(image.name, self.binaries["pause"], "/pause",
                                     ("--entrypoint", '["/pause"]', "--user", "65535:65535"))
        elif image.context is not None:
            self._build_dockerfile(image)
        else:
            assert image.base is not None
            container = self._buildah("from", "--pull-never", "--quiet", image.base).strip()
            try:
                if image.script:
                    with tempfile.TemporaryDirectory(dir=self.dir) as work:
                        script = Path(work) / "intercept"
                        script.write_text(image.script)
                        script.chmod(0o755)
                        self._buildah("copy", container, str(script), "/usr/local/bin/intercept")
                self._buildah("config", *image.config, container)
                self._buildah("commit", "--quiet", container, image.name)
            finally:
                self._buildah("rm", container, check=False)
        partial = archive.with_suffix(f".{os.getpid()}.partial")
        partial.unlink(missing_ok=True)
        self._buildah("push", "--quiet", image.name, f"docker-archive:{partial}:{image.name}")
        os.replace(partial, archive)
        self.say(f"images: built {image.name} in {time.monotonic() - started:.0f}s ({layers_size(archive) / 1e6:.0f} MB)")
        return Built(image.name, archive)

    def _present(self, name: str) -> bool:
        return self._buildah("images", "--quiet", name, check=False).strip() != ""

    def _build_base(self) -> None:
        with tempfile.TemporaryDirectory(dir=self.dir) as work:
            rootfs = Path(work) / "rootfs.tar"
            _run([*MMDEBSTRAP, str(rootfs), MIRROR])
            self._build_from_scratch(BASE, rootfs, "/", BASE_CONFIG)

    def _build_from_scratch(self, name: str, source: Path, target: str, config: Iterable[str]) -> None:
        container = self._buildah("from", "--quiet", "scratch").strip()
        try:
            self._buildah("add", container, str(source), target)
            self._buildah("config", *config, container)
            self._buildah("commit", "--quiet", container, name)
        finally:
            self._buildah("rm", container, check=False)

    def _build_dockerfile(self, image: Image) -> None:
        assert image.context is not None and image.base is not None
        # No --layers: buildah's layer cache does not see a change in what a RUN --mount=from=STAGE binds,
        # and would keep an agent built from older code. This module's own cache is keyed on the inputs.
        argv = ["bud", "--quiet", "--pull-never", "--runtime", "runc",
                "--build-arg", f"PYTHON_IMAGE={image.base}", "-f", str(image.dockerfile or image.context / "Dockerfile"),
                "-t", image.name, *(["--target", image.target] if image.target else [])]
        for limit, name, most in ((resource.RLIMIT_NOFILE, "nofile", 20000), (resource.RLIMIT_NPROC, "nproc", 32768)):
            soft, _ = resource.getrlimit(limit)  # the build's limits may only be lower than ours
            value = most if soft == resource.RLIM_INFINITY else min(soft, most)
            argv += ["--ulimit", f"{name}={value}:{value}"]
        with tempfile.TemporaryDirectory(dir=self.dir) as work:
            if image.pip:
                argv += ["--network", "host", *self._pip_mounts(Path(work))]
            elif image.apt:
                argv += ["--network", "host"]
            else:
                argv += ["--network", "none"]
            self._buildah(*argv, str(image.context))

    def _pip_mounts(self, work: Path) -> list[str]:
        """This machine's way to the package index (CA bundle, pip.conf) and the pins, for RUN steps only."""
        conf = Path("/etc/pip.conf").read_text() if Path("/etc/pip.conf").is_file() else ""
        if "[global]" not in conf:
            conf += "\n[global]\n"
        conf = conf.replace("[global]", "[global]\nconstraint = /run/intercept-build/constraints.txt", 1)
        (work / "pip.conf").write_text(conf)
        mounts = ["-v", f"{work / 'pip.conf'}:/etc/pip.conf:ro",
                  "-v", f"{ROOT / 'constraints.txt'}:/run/intercept-build/constraints.txt:ro"]
        bundle = Path("/etc/ssl/certs/ca-certificates.crt")
        if bundle.is_file():
            mounts += ["-v", f"{bundle}:{bundle}:ro"]
        return mounts

    def _buildah(self, *args: str, check: bool = True) -> str:
        argv = ["buildah", "--root", str(self.storage), "--runroot", str(self.dir / "run"),
                "--storage-driver", "overlay", *args]
        return _run(argv, check=check)


def bundle(built: list[Built]) -> Path:
    """One docker archive of all ``built``, each layer once (they share the base's): cached beside them."""
    digest = hashlib.sha256("\0".join(str(b.archive) for b in built).encode()).hexdigest()[:16]
    target = built[0].archive.parent / f"all.{digest}.tar"
    if target.is_file():
        return target
    partial = target.with_suffix(f".{os.getpid()}.partial")
    manifests: list[dict] = []
    seen = {"manifest.json", "repositories"}
    with tarfile.open(partial, "w") as out:
        for image in built:
            with tarfile.open(image.archive) as tar:
                manifests += json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
                for member in tar:
                    if member.name not in seen:
                        seen.add(member.name)
                        out.addfile(member, tar.extractfile(member) if member.isfile() else None)
        data = json.dumps(manifests).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        out.addfile(info, io.BytesIO(data))
    os.replace(partial, target)
    for old in target.parent.glob("all.*.tar"):
        if old != target:
            old.unlink()
    return target


def load(built: list[Built], ctr: list[str], say: Say = lambda line: None) -> None:
    """Import the images into a containerd (``ctr``: its argv, address and namespace included)."""
    started = time.monotonic()
    _run([*ctr, "images", "import", "--no-unpack", str(bundle(built))])
    say(f"images: {len(built)} imported into the node in {time.monotonic() - started:.1f}s")


def layers_size(archive: Path, without: Path | None = None) -> int:
    """Bytes of the (uncompressed) layers of a docker archive, less those it shares with ``without``'s."""
    def layers(path: Path) -> dict[str, int]:
        with tarfile.open(path) as tar:
            manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
            return {name: tar.getmember(name).size for name in manifest[0]["Layers"]}

    mine = layers(archive)
    theirs = layers(without) if without else {}
    return sum(size for name, size in mine.items() if name not in theirs)


def _files(roots: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for root in roots:
        if root.is_dir():
            out += sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                          and p.suffix not in (".pyc", ".pyo"))
        elif root.is_file():
            out.append(root)
    return out


def _run(argv: list[str], check: bool = True) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-30:])
        raise BuildFailed(f"`{' '.join(argv[:12])}` failed with exit code {result.returncode}:\n{tail}")
    return result.stdout
