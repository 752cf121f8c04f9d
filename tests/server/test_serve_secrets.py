"""`shardline serve` takes its API key from $SHARDLINE_API_KEY or --api-key-file, so `ps`
does not show it; --api-key still works. The key is enforced either way."""

from __future__ import annotations

import pathlib

import httpx
import psutil
import pytest

from server.process import fake_serve_command, server_process

KEY = "sk-secret-0123456789abcdef"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.mark.parametrize("via", ["env", "file", "flag"])
def test_the_api_key_from_env_or_file_is_enforced_and_not_on_the_command_line(
    via: str, tmp_path: pathlib.Path
) -> None:
    args, env = ["--served-model-name", "m"], {}
    if via == "env":
        env["SHARDLINE_API_KEY"] = KEY
    elif via == "file":
        key_file = tmp_path / "api-key"
        key_file.write_text(KEY + "\n")
        args += ["--api-key-file", str(key_file)]
    else:
        args += ["--api-key", KEY]
    with server_process(fake_serve_command(*args), tmp_path, env=env) as server:
        server.wait_healthy(60)
        shown = KEY in " ".join(psutil.Process(server.proc.pid).cmdline())
        assert shown is (via == "flag")
        url = server.base_url + "/v1/chat/completions"
        assert httpx.post(url, json=BODY, timeout=30).status_code == 401
        wrong = {"Authorization": "Bearer not-the-key"}
        assert httpx.post(url, json=BODY, headers=wrong, timeout=30).status_code == 401
        right = {"Authorization": f"Bearer {KEY}"}
        response = httpx.post(url, json=BODY, headers=right, timeout=30)
        assert response.status_code == 200, response.text
        assert server.stop() == 0
        log = server.log()
    assert ("--api-key is visible to every user" in log) is (via == "flag"), log


def test_api_key_and_api_key_file_together_are_refused(tmp_path: pathlib.Path) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(KEY)
    command = fake_serve_command("--api-key", KEY, "--api-key-file", str(key_file))
    with server_process(command, tmp_path) as server:
        assert server.proc.wait(timeout=60) == 2
        assert "give --api-key or --api-key-file, not both" in server.log()
