"""Read deploy/'s image lock files and Dockerfiles, and say what in them is not pinned.

Hand-written because no maintained library checks a pip lock against a Dockerfile; the parsing
itself is packaging's (the library pip uses)."""

from __future__ import annotations

import importlib.metadata
import re
import shlex
from dataclasses import dataclass

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})$")
# pip options that take a value: their value is not a package to install.
VALUED_OPTIONS = {"-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url",
                  "-f", "--find-links"}


@dataclass(frozen=True)
class Pin:
    """One locked package: canonical name, exact version and the sha256 hashes pip must see."""

    name: str
    version: str
    hashes: tuple[str, ...]


def lock_entries(text: str) -> list[str]:
    """The requirement entries of a pip requirements file, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    entries = [re.sub(r"(^|\s)#.*$", "", line).strip() for line in joined.splitlines()]
    return [entry for entry in entries if entry]


def read_lock(text: str) -> tuple[dict[str, Pin], list[str]]:
    """Pins of a lock file, and one problem line per entry that is not ``name==version`` with a hash."""
    pins: dict[str, Pin] = {}
    problems = []
    for entry in lock_entries(text):
        if entry.startswith("-"):
            problems.append(f"{entry!r}: pip options belong in the Dockerfile, not the lock")
            continue
        requirement_text, *options = entry.split()
        requirement = Requirement(requirement_text)
        specifiers = list(requirement.specifier)
        hashes = tuple(found.group(1) for found in map(HASH.match, options) if found)
        name = canonicalize_name(requirement.name)
        if requirement.url or len(specifiers) != 1 or specifiers[0].operator != "==" \
                or "*" in specifiers[0].version:
            problems.append(f"{requirement_text}: not pinned to one exact version (name==version)")
        elif not hashes or len(hashes) != len(options):
            problems.append(f"{requirement_text}: needs --hash=sha256:... for every file pip may take")
        elif name in pins:
            problems.append(f"{requirement_text}: {name} is locked twice")
        else:
            pins[name] = Pin(name, specifiers[0].version, hashes)
    return pins, problems


def marker_environment(python_version: str, extra: str = "") -> dict[str, str]:
    """PEP 508 marker values of the images: CPython ``python_version`` on x86_64 Linux."""
    return {"python_version": python_version, "python_full_version": f"{python_version}.0",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
            "os_name": "posix", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "platform_release": "", "platform_version": "",
            "implementation_version": f"{python_version}.0", "extra": extra}


def applies(requirement: Requirement, python_version: str, extras: frozenset[str]) -> bool:
    """Whether ``requirement`` applies in the image when its parent was asked for with ``extras``."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate(marker_environment(python_version, extra))
               for extra in {""} | set(extras))


def installed_requirements(pin: Pin) -> list[Requirement] | None:
    """Requirements of the package installed here, if it is the locked version; else None."""
    try:
        distribution = importlib.metadata.distribution(pin.name)
    except importlib.metadata.PackageNotFoundError:
        return None
    if Version(distribution.version) != Version(pin.version):
        return None
    return [Requirement(text) for text in distribution.requires or []]


def unmet_requirements(pins: dict[str, Pin], roots: list[str], python_version: str,
                       requirements_of=installed_requirements) -> tuple[list[str], set[str]]:
    """Walk from ``roots`` through the metadata of packages installed here at their locked version.

    Returns one line per requirement the lock lacks or does not satisfy, and the names whose own
    requirements could be read (the others are left to ``pip check`` in the image build).
    ``requirements_of(pin)`` gives a pin's requirements, or None where they cannot be read."""
    queue = [(Requirement(root), "the image") for root in roots]
    seen: set[tuple[str, frozenset[str]]] = set()
    unmet, walked = [], set()
    while queue:
        requirement, parent = queue.pop()
        name, extras = canonicalize_name(requirement.name), frozenset(requirement.extras)
        pin = pins.get(name)
        if pin is None or not requirement.specifier.contains(pin.version, prereleases=True):
            found = pin.version if pin else "nothing"
            unmet.append(f"{parent} needs {requirement}; the lock has {found}")
            continue
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        children = requirements_of(pin)
        if children is None:
            continue
        walked.add(name)
        queue += [(child, name) for child in children if applies(child, python_version, extras)]
    return sorted(set(unmet)), walked


def pip_installs(dockerfile: str) -> list[list[str]]:
    """The arguments after ``pip install`` of each pip command in a Dockerfile's RUN instructions."""
    joined = re.sub(r"\\\n", " ", dockerfile)
    commands = []
    for line in joined.splitlines():
        if not line.startswith("RUN "):
            continue
        for command in re.split(r"&&|;|\|\|", line[4:]):
            words = shlex.split(command, comments=True)
            for i in range(len(words) - 1):
                if words[i] in ("pip", "pip3") and words[i + 1] == "install":
                    commands.append(words[i + 2:])
    return commands


def unlocked_installs(dockerfile: str, lock: str) -> list[str]:
    """pip commands of a Dockerfile that could install a package, or a version, outside ``lock``."""
    problems = []
    for arguments in pip_installs(dockerfile):
        shown = "pip install " + " ".join(arguments)
        values = {arguments[i + 1] for i, word in enumerate(arguments[:-1]) if word in VALUED_OPTIONS}
        requirement_files = [arguments[i + 1] for i, word in enumerate(arguments[:-1])
                             if word in ("-r", "--requirement")]
        targets = [word for word in arguments if not word.startswith("-") and word not in values]
        if "--no-deps" not in arguments:
            problems.append(f"{shown}: without --no-deps pip resolves dependencies itself")
        if requirement_files and (requirement_files != [lock] or "--require-hashes" not in arguments):
            problems.append(f"{shown}: must install {lock} alone, with --require-hashes")
        if targets not in ([], ["."]) or (not targets and not requirement_files):
            problems.append(f"{shown}: installs {targets or 'nothing'}; only the lock and the package (.)")
    return problems
