"""One import package: the wheel holds `shardline` only, and a user's own modules named like
shardline's layers (`model.py`, `engine.py`, ...) never collide with it."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_holds_shardline_only(tmp_path: pathlib.Path) -> None:
    """Built from the repository (as pip would), its top level is `shardline` (plus metadata),
    and every package folder of src/, the kernels' sources and the chat page's files are inside."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("shardline-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"shardline"}, top
    packages = {str(p.parent.relative_to(ROOT / "src")) for p in (ROOT / "src").rglob("__init__.py")}
    for package in packages:
        prefix = "shardline/" if package == "." else f"shardline/{package}/"
        assert f"{prefix}__init__.py" in names, package
    assert "shardline/worker/__main__.py" in names
    assert any(n.startswith("shardline/model/csrc/") and n.endswith(".cpp") for n in names)
    for name in ("index.html", "chat.css", "chat.js"):  # the chat page at / (engine/server/ui.py)
        assert f"shardline/engine/server/static/{name}" in names, name
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "shardline = shardline.engine.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_a_users_modules_named_like_shardlines_layers_do_not_collide(
    tmp_path: pathlib.Path, tiny_llama_dir: pathlib.Path
) -> None:
    """A folder holding model.py, engine.py, worker.py, transport.py and config.py beside a
    script that imports shardline and generates (workers as processes, over shared memory)."""
    for name in ("model", "engine", "worker", "transport", "config"):
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('the user\\'s own {name}.py was imported')\n")
    (tmp_path / "app.py").write_text(textwrap.dedent(f"""
        import asyncio
        from shardline import Engine, EngineConfig, SamplingParams

        async def main():
            config = EngineConfig(model={str(tiny_llama_dir)!r}, transport="shm")
            async with await Engine.start(config) as engine:
                tokens = []
                async for out in engine.generate([5, 6, 7], SamplingParams(max_tokens=4, temperature=0)):
                    tokens += out.delta_token_ids
                print("tokens", len(tokens))

        asyncio.run(main())
    """))
    proc = subprocess.run([sys.executable, "app.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokens 4" in proc.stdout
