"""The edge install's size on disk: the wheel with its core dependencies only (no extras),
at the lock's versions, in a fresh virtual environment; beside it the same core with
``prefect-client`` (Prefect without its server, UI and CLI) in place of ``prefect``, to
show what that switch would save and what it would lose.

    .venv/bin/python bench/edge_install.py [--keep DIR]

Needs uv (the dev extra) and its package cache (or the index). The last line is one JSON
object with every figure.
"""

from __future__ import annotations

import argparse
import email
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock.txt"
UV = Path(sys.executable).with_name("uv")


def uv(*args: object) -> None:
    """From the package cache alone when it suffices, else with the index."""
    if subprocess.run([str(UV), *map(str, args), "--offline"], check=False, capture_output=True).returncode:
        subprocess.run([str(UV), *map(str, args)], check=True, capture_output=True)


def venv(path: Path) -> Path:
    subprocess.run([str(UV), "venv", "--quiet", "--python", sys.executable, str(path)], check=True)
    return path / "bin" / "python"


def site_packages(python: Path) -> Path:
    return next((python.parent.parent / "lib").glob("python3.*/site-packages"))


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6


def distributions(python: Path) -> set[str]:
    out = subprocess.run([str(UV), "pip", "freeze", "--quiet", "--python", str(python)], check=True,
                         capture_output=True, text=True).stdout
    return {line.split("==")[0].lower() for line in out.splitlines() if "==" in line}


def core_requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        message = email.message_from_bytes(zf.read(meta))
    return [r for r in message.get_all("Requires-Dist") or [] if "extra ==" not in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="build here and leave the environments (default: a temp dir)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="edge-install-"))
    root.mkdir(parents=True, exist_ok=True)

    uv("build", "--quiet", "--wheel", "-o", root / "dist", REPO)
    wheel = next((root / "dist").glob("driftloop-*.whl"))
    prefect = re.search(r"^prefect==(\S+)", LOCK.read_text(), re.MULTILINE).group(1)

    core = venv(root / "core")
    uv("pip", "install", "--quiet", "--python", core, wheel, "-c", LOCK)

    client = venv(root / "client")
    requirements = [r for r in core_requirements(wheel) if not re.match(r"(prefect|fastapi)\b", r)]
    uv("pip", "install", "--quiet", "--python", client, f"prefect-client=={prefect}", *requirements, "-c", LOCK)
    uv("pip", "install", "--quiet", "--no-deps", "--python", client, wheel)

    sizes = {name: size_mb(site_packages(py)) for name, py in (("core", core), ("client", client))}
    only_core = sorted(distributions(core) - distributions(client))
    largest = sorted(((size_mb(p), p.name) for p in site_packages(core).iterdir()
                      if p.is_dir() and not p.name.endswith("-info")), reverse=True)[:8]
    result = {
        "prefect": prefect,
        "core_mb": round(sizes["core"]), "core_distributions": len(distributions(core)),
        "largest_mb": {name: round(mb) for mb, name in largest},
        "with_prefect_client_mb": round(sizes["client"]),
        "saved_mb": round(sizes["core"] - sizes["client"]),
        "only_with_prefect": only_core,
        "prefect_cli_with_client": client.with_name("prefect").exists(),
    }
    print(f"edge install (core only, prefect {prefect}): {sizes['core']:.0f} MB in site-packages, "
          f"{result['core_distributions']} distributions")
    print("  largest: " + ", ".join(f"{k} {v}" for k, v in result["largest_mb"].items()))
    print(f"with prefect-client {prefect} instead: {sizes['client']:.0f} MB (saves {result['saved_mb']} MB; "
          f"no `prefect` CLI: {not result['prefect_cli_with_client']}; drops {', '.join(only_core)})")
    print(json.dumps(result))
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
